"""How commands and files reach a target: the contract, local, SSH."""
