"""``python -m stmed.convert SRC DST``: original-layout LLaVA to llava-hf (``stmed.model.convert``)."""

import sys

from stmed.model.convert import main

if __name__ == "__main__":
    sys.exit(main())
