"""storyreel: one prompt in, a short narrated video out.

This package holds what every part of the system shares: the generated
protobuf contracts (``storyreel.<area>.v1``), artifact storage, the service
bootstrap, logging, settings and the ``storyreel`` command line.
"""

__version__ = "0.1.0"
