"""The ``eventwire`` command line: the entry point and the operator commands.

Only the entry point (``eventwire.__main__`` and the console script) imports
this package; the rooms under ``eventwire`` never do.
"""
