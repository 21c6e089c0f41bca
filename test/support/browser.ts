// A real headless Chromium for the page tests, driven by playwright-core. The browser comes from the
// npm package @sparticuz/chromium (unpacked to the temp dir on first use), so `npm test` needs nothing
// beyond `npm install`; CHROMIUM_PATH picks another one (e.g. Debian's /usr/bin/chromium).
import { chromium, type Browser } from 'playwright-core';

export async function launchChromium(): Promise<Browser> {
  const executablePath = process.env.CHROMIUM_PATH || (await (await import('@sparticuz/chromium')).default.executablePath());
  return chromium.launch({
    executablePath,
    headless: true,
    // As root Chromium needs --no-sandbox; the rest keeps it from calling home (this machine has no
    // network, and tests may reach only loopback).
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--no-first-run',
      '--disable-quic',
      '--disable-dev-shm-usage',
    ],
  });
}
