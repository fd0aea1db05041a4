
_
payments-api-no-legacy-db*10.20.0.0/1625432JpaymentsR"


appapi
tierNotInbatch 