"""The subcommands of `alignkit`: one small module each (flags -> library -> output).

Each module defines `register(app)`; heavy imports happen inside the command function so
that `--help` stays instant.
"""
