"""C{python -m gsmail.script}: smtp2gs (L{gsmail.script.main})."""

from gsmail.script import main

main()
