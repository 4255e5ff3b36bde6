from llmos.service import run_service
from services.inference.app import DEFINITION

run_service(DEFINITION)
