import sys

from tinyllm_hf.tasks.build import main

sys.exit(main())
