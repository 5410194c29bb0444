"""Import first in every host module: Ultralytics must never reach the network on its own.

Ultralytics reads ``YOLO_OFFLINE`` once, when it is first imported (weights, fonts, version and
pip checks); an offline industrial network would hang on them. The CLI imports this module
before it dispatches a host command; host modules import it first so that library use (tests,
bench scripts, notebooks) is offline too. A value the user set is kept.
"""

import os

os.environ.setdefault("YOLO_OFFLINE", "1")
