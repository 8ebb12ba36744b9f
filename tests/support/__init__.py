"""What the test directories, benches and scripts share: the scripted fake node (`fake_node`), a free port
(`ports`), real servers on loopback (`servers`) and a router in front of fake nodes (`herd`)."""
