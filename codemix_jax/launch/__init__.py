"""`codemix launch`: run a training job on a TPU slice with the tools TPU users already run.

gcloud's TPU VM and queued-resource commands, xpk for GKE and a SkyPilot managed job do the
provisioning and the recovery; this package composes their commands from one launch spec, refuses
a job that cannot run before any of them runs, and remembers the launch for later subcommands.
"""
