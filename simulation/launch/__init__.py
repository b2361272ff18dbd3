"""Starting Flower: the simulation engine and the local deployment (``medfed deploy-local``).

``engine`` (a simulation SuperLink + ``flwr run``), ``processes`` (child processes, ports,
Flower's environment), ``compose`` (docker-compose.yml as the deployment's single source),
``deploy`` (certificates, SuperLink, SuperNodes and site workers on loopback).
"""
