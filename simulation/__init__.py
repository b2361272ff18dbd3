"""Researcher tooling: public datasets, partitioners, virtual sites, the simulation driver."""
