"""Thin click commands, one module per command group. They parse options, call the library,
and print; they never do maths or parse checkpoint files themselves."""
