"""Where the repository is, for tests in any folder under tests/ (README, docs/, recipes/, notebooks/, uptrain/)."""
from pathlib import Path

REPO_PATH = Path(__file__).resolve().parent.parent
REPO = str(REPO_PATH)
