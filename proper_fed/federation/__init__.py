"""What the server and the devices agree on: the wire contract, the reply schema, the run settings and run-config
files, and the Flower processes a deployment or a simulation runs."""
