"""The benchmark commands behind `omnistream bench ...`: each prints a table and writes JSON."""
