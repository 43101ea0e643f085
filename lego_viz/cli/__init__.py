"""The command line, ``python -m lego_viz``: the parser and the core subcommands in
:mod:`~lego_viz.cli.commands`, ``advise`` and ``run`` beside them; the zoo and SMoRA subcommands live
in their own packages and are imported only when named.
"""
