from launcher.cli import entry_point

entry_point()
