"""Account security: registration checks, email codes, CAPTCHA, TOTP, failure throttling, mail."""
