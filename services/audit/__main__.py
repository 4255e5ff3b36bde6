from llmos.service import run_service
from services.audit.app import DEFINITION

run_service(DEFINITION)
