from services.gateway.app import run_gateway

run_gateway()
