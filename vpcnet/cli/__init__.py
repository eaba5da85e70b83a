"""The `vpcnet` command: one module per sub-command, `main` puts them together."""
