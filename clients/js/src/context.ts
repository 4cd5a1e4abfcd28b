/**
 * The hello `context`: what the platform says about the app, the OS, the
 * device and the locale. The server copies it onto `session.start`.
 */

/** React Native's `Platform` module (or the same fields from elsewhere). */
export interface PlatformLike {
  OS: string;
  Version?: string | number;
  constants?: Record<string, unknown>;
}

export interface AppInfo {
  name?: string;
  version?: string;
  build?: string;
}

export const SDK_NAME = "eventwire-js";
export const SDK_VERSION = "1.0.0";

function str(value: unknown): string | undefined {
  return typeof value === "string" && value ? value : typeof value === "number" ? String(value) : undefined;
}

/** The locale of the runtime's Intl, if it has one. */
export function detectLocale(): string | undefined {
  try {
    return Intl.DateTimeFormat().resolvedOptions().locale || undefined;
  } catch {
    return undefined;
  }
}

/** The context of a hello, from the options and what the runtime tells. */
export function buildContext(
  app: AppInfo | undefined,
  platform: PlatformLike | undefined,
  extra: Record<string, unknown> | undefined,
): Record<string, unknown> {
  const context: Record<string, unknown> = { library: { name: SDK_NAME, version: SDK_VERSION } };
  if (app) context.app = { ...app };
  const proc = (globalThis as { process?: { platform?: string; versions?: { node?: string } } }).process;
  if (platform) {
    const c = platform.constants ?? {};
    context.os = { name: platform.OS, version: str(platform.Version) ?? str(c.osVersion) };
    // Android names the model in constants.Model; iOS gives no model without a native module.
    const model = str(c.Model) ?? str(c.model);
    const manufacturer = str(c.Manufacturer) ?? str(c.Brand);
    if (model || manufacturer) context.device = { model, manufacturer };
  } else if (proc?.versions?.node) {
    context.os = { name: proc.platform };
    context.runtime = { name: "node", version: proc.versions.node };
  }
  const locale = detectLocale();
  if (locale) context.locale = locale;
  try {
    const timezone = Intl.DateTimeFormat().resolvedOptions().timeZone;
    if (timezone) context.timezone = timezone;
  } catch {
    // No Intl time zones on this runtime.
  }
  return { ...context, ...extra };
}
