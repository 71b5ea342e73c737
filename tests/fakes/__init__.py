"""Local HTTP fakes of the provider APIs, served over real sockets (see server.py)."""
