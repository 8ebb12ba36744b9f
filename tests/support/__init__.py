"""What the test directories share: the scripted fake node (`fake_node`) and a free port (`ports`)."""
