"""The guest owner's key broker: hosts ask it for a launch session and, after the launch is
measured, for the secret; it verifies the platform chain, the measurement and the owner's rules
before it releases anything. `client` is the host side; `app`/`service`/`db` the owner's server."""
