from llmos.service import run_service
from services.dialogue.app import DEFINITION

run_service(DEFINITION)
