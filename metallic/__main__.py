from metallic.cli import entry

entry()
