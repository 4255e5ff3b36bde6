from llmos.service import run_service
from services.speech.app import DEFINITION

run_service(DEFINITION)
