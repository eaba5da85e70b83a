"""`python -m vpcnet.cli`: the `vpcnet` command."""
import sys

from vpcnet.cli.main import main

sys.exit(main())
