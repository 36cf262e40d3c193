from zebrax.app.cli import entry

entry()
