"""Start `twinkle serve` with the server_config.yaml next to this file (extra flags pass through).

    python cookbook/client/server/transformer/server.py [--port 8001]
"""

import os
import sys
from pathlib import Path

CONFIG = Path(__file__).with_name("server_config.yaml")

if __name__ == "__main__":
    twinkle = str(Path(sys.executable).with_name("twinkle"))
    os.execv(twinkle, [twinkle, "serve", "--config", str(CONFIG), *sys.argv[1:]])
