from llmos.service import run_service
from services.retrieval.app import DEFINITION

run_service(DEFINITION)
