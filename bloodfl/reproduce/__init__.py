"""Reproduce a paper's protocol with one command (``python -m bloodfl.reproduce <paper>``) and turn finished
studies into the tables of docs/results.md (``python -m bloodfl.reproduce.results``)."""
