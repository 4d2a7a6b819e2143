"""Example applications built on longembed (run with `python -m longembed.plugin.examples.NAME`)."""
