"""`python -m tinyllm_hf.tasks`: write the embedded SFT set's conversations or held-out task records to JSONL."""

import sys

from tinyllm_hf.cli import run_command
from tinyllm_hf.tasks.build import main

sys.exit(run_command("python -m tinyllm_hf.tasks", main))
