"""storyreel gateway: the public API that runs each job through the services."""
