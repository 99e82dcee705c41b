// The one script of the web view: a Copy button beside the export command (the command stays
// selectable without it).
document.querySelectorAll("button.copy").forEach(function (button) {
  button.hidden = false;
  button.addEventListener("click", function () {
    var field = document.getElementById(button.dataset.copy);
    field.select();
    if (navigator.clipboard) { navigator.clipboard.writeText(field.value).catch(function () {}); }
    button.textContent = "Copied";
  });
});
