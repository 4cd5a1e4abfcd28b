/*
 * The demo shop: a small single-page app that uses the eventwire tracker.
 *
 * Page views are tracked by the tracker itself (data-spa="true": one
 * page.visit per view); the newsletter form and the banner by their
 * data-ew-* attributes; this file adds the shop's own events with
 * eventwire.push([...]), which works before and after tracker.js has loaded.
 */
(function () {
  "use strict";

  // Calls made before the async tracker loads wait in this array.
  window.eventwire = window.eventwire || [];

  var PRODUCTS = [
    {
      sku: "K-1",
      name: "Copper kettle",
      price: 39.9,
      art: "kettle",
      text: "Boils a litre in three minutes and whistles when done.",
    },
    {
      sku: "M-2",
      name: "Stoneware mug",
      price: 12.5,
      art: "mug",
      text: "Holds 350 ml and keeps it warm a little longer.",
    },
    {
      sku: "T-3",
      name: "Loose-leaf tea",
      price: 8.75,
      art: "tea",
      text: "A smoky black tea, 200 g in a tin.",
    },
    {
      sku: "S-4",
      name: "Oak spoon set",
      price: 19.0,
      art: "spoon",
      text: "Three spoons turned from one oak board.",
    },
  ];
  var BY_SKU = {};
  PRODUCTS.forEach(function (p) {
    BY_SKU[p.sku] = p;
  });
  var TITLES = { home: "Home", products: "Products", product: "Product", cart: "Cart" };
  var cart = {}; // sku -> quantity
  var CUSTOMER = "customer-42";

  function $(id) {
    return document.getElementById(id);
  }

  function money(n) {
    return n.toFixed(2);
  }

  /** Send an event through the tracker, and show it in the side panel. */
  function send(action, params, label) {
    window.eventwire.push(["track", action, params, label]);
    note(action + " " + JSON.stringify(params));
  }

  function note(text) {
    var li = document.createElement("li");
    li.textContent = new Date().toLocaleTimeString() + "  " + text;
    var log = $("log");
    log.insertBefore(li, log.firstChild);
    while (log.children.length > 12) log.removeChild(log.lastChild);
  }

  // ---- views -----------------------------------------------------------------

  function card(p) {
    var el = document.createElement("div");
    el.className = "card";
    var art = document.createElement("div");
    art.className = "art " + p.art;
    var name = document.createElement("h3");
    name.textContent = p.name;
    var price = document.createElement("p");
    price.className = "price";
    price.textContent = money(p.price);
    var view = document.createElement("a");
    view.href = "/demo?view=product&sku=" + p.sku;
    view.textContent = "View product";
    view.setAttribute("data-nav", "product");
    view.setAttribute("data-sku", p.sku);
    var add = document.createElement("button");
    add.type = "button";
    add.textContent = "Add to cart";
    add.addEventListener("click", function () {
      addToCart(p.sku);
    });
    el.append(art, name, price, view, add);
    return el;
  }

  function fill(id, list) {
    var box = $(id);
    box.textContent = "";
    list.forEach(function (p) {
      box.appendChild(card(p));
    });
  }

  function route() {
    var q = new URLSearchParams(location.search);
    var view = q.get("view") || "home";
    if (!TITLES[view]) view = "home";
    var sku = q.get("sku");
    if (view === "product" && !BY_SKU[sku]) view = "products";
    return { view: view, sku: sku };
  }

  /** Show the view of the current URL. */
  function render() {
    var r = route();
    document.querySelectorAll(".view").forEach(function (v) {
      v.hidden = v.id !== "view-" + r.view;
    });
    var title = TITLES[r.view];
    if (r.view === "product") {
      var p = BY_SKU[r.sku];
      title = p.name;
      $("detail-art").className = "art " + p.art;
      $("detail-name").textContent = p.name;
      $("detail-text").textContent = p.text;
      $("detail-price").textContent = money(p.price);
    }
    if (r.view === "cart") renderCart();
    // The tracker sends page.visit just after the history change, with this title.
    document.title = title + " · eventwire demo shop";
    return r;
  }

  /** SPA navigation: new URL in the history, new view, no page load. */
  function go(url) {
    history.pushState(null, "", url);
    var r = render();
    note("page.visit " + url + " (by the tracker: data-spa)");
    if (r.view === "product") {
      var p = BY_SKU[r.sku];
      send("product.view", { sku: p.sku, name: p.name, price: p.price }, "Viewed " + p.name);
    }
    window.scrollTo(0, 0);
  }

  document.addEventListener("click", function (e) {
    var a = e.target.closest("a[data-nav]");
    if (!a || e.ctrlKey || e.metaKey || e.shiftKey) return;
    e.preventDefault();
    go(a.getAttribute("href"));
  });

  window.addEventListener("popstate", render);

  // ---- cart ------------------------------------------------------------------

  function count() {
    return Object.keys(cart).reduce(function (n, sku) {
      return n + cart[sku];
    }, 0);
  }

  function total() {
    return Object.keys(cart).reduce(function (n, sku) {
      return n + cart[sku] * BY_SKU[sku].price;
    }, 0);
  }

  function addToCart(sku) {
    var p = BY_SKU[sku];
    cart[sku] = (cart[sku] || 0) + 1;
    $("cart-count").textContent = count();
    send("cart.add", { sku: sku, quantity: 1, price: p.price }, "Added " + p.name + " to cart");
    renderCart();
  }

  function removeFromCart(sku) {
    var quantity = cart[sku];
    delete cart[sku];
    $("cart-count").textContent = count();
    send("cart.remove", { sku: sku, quantity: quantity }, "Removed " + BY_SKU[sku].name);
    renderCart();
  }

  function renderCart() {
    var rows = $("cart-rows");
    rows.textContent = "";
    Object.keys(cart).forEach(function (sku) {
      var tr = document.createElement("tr");
      var cells = [BY_SKU[sku].name, String(cart[sku]), money(cart[sku] * BY_SKU[sku].price)];
      cells.forEach(function (text) {
        var td = document.createElement("td");
        td.textContent = text;
        tr.appendChild(td);
      });
      var td = document.createElement("td");
      var rm = document.createElement("button");
      rm.type = "button";
      rm.textContent = "Remove";
      rm.addEventListener("click", function () {
        removeFromCart(sku);
      });
      td.appendChild(rm);
      tr.appendChild(td);
      rows.appendChild(tr);
    });
    $("cart-total").textContent = money(total());
    $("cart-empty").hidden = count() > 0;
    $("buy").disabled = count() === 0;
  }

  function buy() {
    if (!count()) return;
    var order = "O-" + Math.floor(Math.random() * 1e6);
    var items = Object.keys(cart).map(function (sku) {
      return { sku: sku, quantity: cart[sku] };
    });
    send(
      "order.purchase",
      { order: order, total: Number(money(total())), items: items },
      "Bought order " + order,
    );
    cart = {};
    $("cart-count").textContent = "0";
    $("order-id").textContent = order;
    $("thanks").hidden = false;
    renderCart();
  }

  // ---- identity, newsletter, status ------------------------------------------

  function showWho(name) {
    $("who").textContent = name || "anonymous";
    $("login").hidden = !!name;
    $("logout").hidden = !name;
  }

  $("login").addEventListener("click", function () {
    // A real shop passes the customer's id and a token from its log-in.
    window.eventwire.push(["identify", CUSTOMER]);
    showWho(CUSTOMER);
    note("identify customer-42");
  });

  $("logout").addEventListener("click", function () {
    window.eventwire.push(["reset"]);
    showWho(null);
    note("reset (new anonymous uuid)");
  });

  $("newsletter").addEventListener("submit", function (e) {
    // The tracker has already sent form.submit (it listens first); stay on the page.
    e.preventDefault();
    $("subscribed").hidden = false;
    note("form.submit newsletter (sent by data-ew-form)");
  });

  $("detail-add").addEventListener("click", function () {
    addToCart(route().sku);
  });

  $("detail-buy").addEventListener("click", function () {
    addToCart(route().sku);
    go("/demo?view=cart");
    buy();
  });

  $("buy").addEventListener("click", buy);

  function showStatus() {
    var ew = window.eventwire;
    if (!ew.status) return;
    var s = ew.status();
    if (!s) return;
    $("status").textContent =
      (s.connected ? "connected" : "connecting…") +
      " · uuid " +
      s.uuid +
      " · " +
      s.queued +
      " unacked" +
      (s.dropped ? " · " + s.dropped + " dropped" : "");
    $("status").className = "status " + (s.connected ? "ok" : "wait");
    // The tracker keeps the customer across reloads (a first-party cookie).
    showWho(s.uuid === CUSTOMER ? CUSTOMER : null);
  }

  fill("featured", PRODUCTS.slice(0, 2));
  fill("catalog", PRODUCTS);
  var first = render();
  if (first.view === "product") {
    var p = BY_SKU[first.sku];
    send("product.view", { sku: p.sku, name: p.name, price: p.price }, "Viewed " + p.name);
  }
  showStatus();
  setInterval(showStatus, 1000);
})();
