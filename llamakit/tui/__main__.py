"""`python -m llamakit.tui`: the same as `llamakit-tui`."""

from llamakit.tui import main

if __name__ == "__main__":
    main()
