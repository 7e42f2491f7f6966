"""``python -m lightning_kd`` runs the ``lightning-kd`` command line."""

from lightning_kd.commands import main

raise SystemExit(main())
