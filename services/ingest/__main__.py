from llmos.service import run_service
from services.ingest.app import DEFINITION

if __name__ == "__main__":  # not when a spawned extraction worker imports the main module
    run_service(DEFINITION)
