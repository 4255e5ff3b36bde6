from llmos.service import run_service
from services.ingest.app import DEFINITION

run_service(DEFINITION)
