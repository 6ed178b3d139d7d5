"""Stored weights of the models trained in nncjax (a package so that setup.py ships its *.msgpack files)."""
