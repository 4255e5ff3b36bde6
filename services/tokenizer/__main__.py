from llmos.service import run_service
from services.tokenizer.app import DEFINITION

run_service(DEFINITION)
