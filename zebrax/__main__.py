from zebrax.cli import entry

entry()
