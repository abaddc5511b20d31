"""The distributed tier, a package so that its conftest.py does not replace tests/conftest.py
(both would be the top-level module `conftest` otherwise, breaking `from conftest import ...`)."""
