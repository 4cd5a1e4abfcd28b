// The real @segment/analytics-node, unmodified, pointed at eventwire's HTTP
// listener: EW_HOST, EW_WRITE_KEY. Prints "flushed" once every call is sent.
import { Analytics } from "@segment/analytics-node";

const analytics = new Analytics({
  writeKey: process.env.EW_WRITE_KEY,
  host: process.env.EW_HOST,
  maxEventsInBatch: 10,
  flushInterval: 200,
});
const errors = [];
analytics.on("error", (err) => errors.push(String(err && (err.reason || err.message || err))));
analytics.track({ userId: "node-1", event: "Order Completed", properties: { revenue: 7 } });
analytics.page({ userId: "node-1", name: "Home", properties: { url: "https://shop.example/" } });
analytics.screen({ userId: "node-1", name: "Cart" });
analytics.identify({ userId: "node-1", traits: { plan: "pro" } });
await analytics.closeAndFlush({ timeout: 10000 });
if (errors.length) {
  console.error(errors.join("\n"));
  process.exit(1);
}
console.log("flushed");
