"""Start the vlmfast demo from a checkout: ``python demo/app.py [--model NAME] [--port N] [--host 127.0.0.1]``.

The app itself lives in the package (``vlmfast/demo/app.py``) so that an installed vlmfast has it too; this
file and ``vlmfast demo`` are two ways to start the same thing.
"""

import sys

from vlmfast.demo.app import main

if __name__ == "__main__":
    sys.exit(main())
