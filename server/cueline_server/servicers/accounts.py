from __future__ import annotations

from cueline.v1 import accounts_pb2
from cueline_server.api.pipeline import Call
from cueline_server.servicers.convert import put_time
from cueline_server.services.accounts import AccountService


class AccountServicer:
    def __init__(self, accounts: AccountService) -> None:
        self._accounts = accounts

    async def Register(
        self, request: accounts_pb2.RegisterRequest, call: Call
    ) -> accounts_pb2.RegisterResponse:
        registration = await self._accounts.register(request.email)
        return accounts_pb2.RegisterResponse(api_key=registration.api_key, email=registration.email)

    async def GetAccount(
        self, request: accounts_pb2.GetAccountRequest, call: Call
    ) -> accounts_pb2.GetAccountResponse:
        summary = await self._accounts.summary(call.account)
        account = summary.account
        response = accounts_pb2.GetAccountResponse(
            email=account.email,
            plan=account.plan,
            active_cues=summary.active_cues,
            active_cue_limit=account.active_cue_limit,
            executions_this_month=summary.executions_this_month,
            monthly_execution_limit=account.monthly_execution_limit,
            rate_limit_per_minute=account.rate_limit_per_minute,
            has_webhook_secret=bool(account.webhook_secret),
            api_key_prefix=account.api_key_prefix,
        )
        if account.alert_webhook_url is not None:
            response.alert_webhook_url = account.alert_webhook_url
        return response

    async def RegenerateApiKey(
        self, request: accounts_pb2.RegenerateApiKeyRequest, call: Call
    ) -> accounts_pb2.RegenerateApiKeyResponse:
        key = await self._accounts.regenerate_key(call.account, request.confirm)
        return accounts_pb2.RegenerateApiKeyResponse(api_key=key, previous_key_revoked=True)

    async def GetWebhookSecret(
        self, request: accounts_pb2.GetWebhookSecretRequest, call: Call
    ) -> accounts_pb2.GetWebhookSecretResponse:
        return accounts_pb2.GetWebhookSecretResponse(
            webhook_secret=await self._accounts.webhook_secret(call.account)
        )

    async def RegenerateWebhookSecret(
        self, request: accounts_pb2.RegenerateWebhookSecretRequest, call: Call
    ) -> accounts_pb2.RegenerateWebhookSecretResponse:
        secret = await self._accounts.regenerate_webhook_secret(call.account, request.confirm)
        return accounts_pb2.RegenerateWebhookSecretResponse(
            webhook_secret=secret, previous_secret_revoked=True
        )

    async def UpdateAccount(
        self, request: accounts_pb2.UpdateAccountRequest, call: Call
    ) -> accounts_pb2.UpdateAccountResponse:
        account = await self._accounts.update(
            call.account,
            request.email if request.HasField("email") else None,
            request.alert_webhook_url if request.HasField("alert_webhook_url") else None,
        )
        response = accounts_pb2.UpdateAccountResponse(email=account.email)
        if account.alert_webhook_url is not None:
            response.alert_webhook_url = account.alert_webhook_url
        put_time(response.updated_at, account.updated_at)
        return response

    async def GetUsage(
        self, request: accounts_pb2.GetUsageRequest, call: Call
    ) -> accounts_pb2.GetUsageResponse:
        usage = await self._accounts.usage(call.account)
        response = accounts_pb2.GetUsageResponse(
            plan=usage.plan,
            cues=accounts_pb2.CueUsage(**usage.cues),
            executions=accounts_pb2.ExecutionUsage(**usage.executions),
            outcomes=accounts_pb2.OutcomeUsage(**usage.outcomes),
            rate_limit=accounts_pb2.RateLimitUsage(**usage.rate_limit),
        )
        for period in (response.billing_period, response.period):
            put_time(period.start, usage.period_start)
            put_time(period.end, usage.period_end)
            period.days_remaining = usage.days_remaining
        return response
