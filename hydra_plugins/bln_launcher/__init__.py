"""`hydra/launcher=bln_local|bln_slurm`: `bln-train -m` grids through submitit (bln_launcher.py)."""
