"""launchers: turn a sweep into submitit jobs (SLURM, local GPUs, in-process debug).

Depends on `bln_sweeps`, never on `analysis`. Imports nothing heavy at module load.
"""
