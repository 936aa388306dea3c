"""`python -m convert SRC DST`: the conversion CLI; see distrifusion_jax/cli/convert.py."""

from distrifusion_jax.cli.convert import main

raise SystemExit(main())
